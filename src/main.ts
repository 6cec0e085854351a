#!/usr/bin/env node
// Entry point: `npm start -- --config FILE` runs this file; the installed `oauth2-extproc`
// command runs its compiled copy (bin/oauth2-extproc.js → dist/main.js).
import { main } from './cli.ts';

const code = await main(process.argv.slice(2));
if (code !== undefined) process.exitCode = code;
