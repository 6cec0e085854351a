# syntax=docker/dockerfile:1
# oauth2-extproc: the Envoy ext_proc sidecar as a small, non-root image.
#
#   docker build -t oauth2-extproc .
#   docker run --read-only -v $PWD/config.yaml:/etc/oauth2-extproc/config.yaml:ro oauth2-extproc
#
# The final image is distroless-like: the node binary of the Node base image with the few
# shared libraries it links, the compiled sidecar and its production dependencies, and nothing
# else (no shell, no npm, no package manager, no compiler). The stages before it run on the
# same Node as `npm test` (the `node` devDependency), pinned to the patch release.
# test/deploy/dockerfile.test.ts runs these steps without Docker and checks the pins;
# test/containers/image.test.ts builds and runs the image with a Docker engine.

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

FROM node:24.21.0-trixie-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies only; no install scripts (none of them needs one to run).
RUN --mount=type=cache,target=/root/.npm npm ci --omit=dev --ignore-scripts --no-audit --no-fund

# The final image's root: node, the libraries `ldd` says it loads, and a passwd/group naming
# the runtime user (uid 1000, as in the Node image). glibc 2.34+ has the DNS and files
# resolvers built in, so compose and Kubernetes service names resolve without NSS modules.
FROM node:24.21.0-trixie-slim AS rootfs
WORKDIR /rootfs
RUN set -eu; \
    node="$(command -v node)"; \
    mkdir -p usr/local/bin etc; \
    cp "$node" usr/local/bin/node; \
    for lib in $(ldd "$node" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do \
      mkdir -p ".$(dirname "$lib")"; cp -L "$lib" ".$lib"; \
    done; \
    echo 'node:x:1000:1000:node:/nonexistent:/sbin/nologin' > etc/passwd; \
    echo 'node:x:1000:' > etc/group

FROM scratch AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="oauth2-extproc" \
      org.opencontainers.image.description="Envoy external processor that injects OAuth2 client-credentials tokens and strips the caller's subscription key" \
      org.opencontainers.image.source="https://github.com/oauth2-extproc/oauth2-extproc" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=rootfs /rootfs/ /
ENV PATH=/usr/local/bin NODE_ENV=production
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
COPY --from=deps /app/node_modules/ node_modules/
COPY bin/ bin/
COPY proto/ proto/
COPY --from=build /app/dist/ dist/
# A numeric user, so that Kubernetes can check runAsNonRoot without looking up a name. Nothing
# is written at run time (logs go to stdout, the Unix socket goes to a mounted volume), so a
# read-only root filesystem works as is.
USER 1000:1000
# ext_proc gRPC and admin HTTP (/healthz, /readyz, /metrics) in the default config layout.
EXPOSE 9001 9002
# Healthy = ready: every profile holds a token (docker compose waits on it). There is no curl
# or shell in the image: node asks the admin port, 9002 unless ADMIN_PORT says otherwise.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch(`http://127.0.0.1:${process.env.ADMIN_PORT || 9002}/readyz`).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# node handles SIGTERM itself (drain, then exit 0); no shell in between to swallow it.
ENTRYPOINT ["node", "bin/oauth2-extproc.js"]
CMD ["--config", "/etc/oauth2-extproc/config.yaml"]
