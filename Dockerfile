# syntax=docker/dockerfile:1
# oauth2-extproc: the Envoy ext_proc sidecar as a small, non-root image.
#
#   docker build -t oauth2-extproc .
#   docker run --read-only -v $PWD/config.yaml:/etc/oauth2-extproc/config.yaml:ro oauth2-extproc
#
# Two stages: the builder has the dev dependencies and compiles TypeScript; the runtime has
# only production dependencies and the compiled files. Both use the same Node as `npm test`
# (the `node` devDependency), pinned to the patch release; test/deploy/dockerfile.test.ts
# runs these steps without Docker and checks the pins.

FROM node:24.21.0-trixie-slim AS build
WORKDIR /app
# Dependencies first: this layer is rebuilt only when the lockfile changes. No install scripts:
# the compiler needs none, and the `node` devDependency's would download a second Node. npm's
# download cache lives in a BuildKit cache mount: reused across builds, never in a layer.
COPY package.json package-lock.json ./
RUN --mount=type=cache,target=/root/.npm npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src/ src/
# The image's own node runs the compiler (node_modules/.bin/node would be the devDependency's
# shim, not installed without scripts).
RUN node node_modules/typescript/bin/tsc -p tsconfig.build.json

FROM node:24.21.0-trixie-slim AS runtime
ENV NODE_ENV=production
# A small young generation. The sidecar keeps about 20 MB of live objects and its streams live
# for well under a millisecond, yet V8 sizes its heap from the memory it sees: the container's
# limit if one is set, else the machine's RAM. Without a limit on a large machine, a 128 MB young
# generation and lazily collected garbage put it near 270 MB RSS at 1,000 requests/s; with 2 MB
# semi-spaces it stays near 160 MB, for about a fifth more CPU per request at full load
# (docs/benchmarks.md). Adding --max-old-space-size (any value) saves about 50 MB more, but makes
# V8 collect the old generation four to five times as often: more CPU per request at full load.
# Set NODE_OPTIONS to override; `server.workers` processes inherit it.
ENV NODE_OPTIONS="--max-semi-space-size=2"
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies only; no install scripts (none of them needs one to run), and no npm
# cache left in the image (it is a cache mount).
RUN --mount=type=cache,target=/root/.npm npm ci --omit=dev --ignore-scripts --no-audit --no-fund
COPY bin/ bin/
COPY proto/ proto/
COPY --from=build /app/dist/ dist/
# A numeric user, so that Kubernetes can check runAsNonRoot without looking up a name: the
# image's `node` user (uid 1000). Nothing is written at run time (logs go to stdout, the Unix
# socket goes to a mounted volume), so a read-only root filesystem works as is.
USER 1000:1000
# ext_proc gRPC and admin HTTP (/healthz, /readyz, /metrics) in the default config layout.
EXPOSE 9001 9002
# node handles SIGTERM itself (drain, then exit 0); no shell in between to swallow it.
ENTRYPOINT ["node", "bin/oauth2-extproc.js"]
CMD ["--config", "/etc/oauth2-extproc/config.yaml"]
