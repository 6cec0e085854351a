#!/usr/bin/env node
// The installed command: the compiled CLI (built by `npm run build`, or `prepare` on install).
import '../dist/main.js';
