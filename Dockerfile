# Builds the release binary and ships it on a slim Debian image.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin creditgate

FROM debian:bookworm-slim
# ca-certificates: the CAs HTTPS upstreams are checked against (unless tls.ca_file);
# curl: the healthchecks of docker-compose.yml.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-create-home creditgate \
    && mkdir -p /var/lib/creditgate && chown creditgate /var/lib/creditgate
COPY --from=build /src/target/release/creditgate /usr/local/bin/creditgate
COPY policies /etc/creditgate/policies
USER creditgate
EXPOSE 8080 8081
# The sqlite store's folder (policies/compose.toml); mount a volume here.
VOLUME /var/lib/creditgate
CMD ["creditgate", "run", "--policy", "/etc/creditgate/policies/compose.toml"]
