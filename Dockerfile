# The managed plugin's root filesystem (`make plugin` exports a container of this image into build/plugin/rootfs).
#
# BASE is any Debian bookworm based image with python3.11 (the default is the public one). Where no registry is
# reachable, `make plugin` first builds a local base with debootstrap (packaging/local-base.sh) and passes it in;
# that base already holds the OS packages below, so this build then needs no network at all.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# ip (xfrm), iptables/nft (the encryption guard), etcd (the embedded single-host store), kmod (modprobe vxlan/esp4)
RUN set -e; \
    need=""; \
    for c in ip:iproute2 iptables:iptables nft:nftables etcd:etcd-server modprobe:kmod; do \
      command -v "${c%%:*}" >/dev/null || need="$need ${c#*:}"; \
    done; \
    if [ -n "$need" ]; then \
      apt-get update -q && apt-get install -y -q --no-install-recommends $need && rm -rf /var/lib/apt/lists/*; \
    fi

# Wheels are built on the build machine (`make wheels`): the image build needs no package index.
COPY build/wheels /tmp/wheels
RUN python3 -m venv /opt/pyoverlay \
    && /opt/pyoverlay/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels pyoverlay \
    && rm -rf /tmp/wheels \
    && ln -s /opt/pyoverlay/bin/pyoverlay /usr/local/bin/pyoverlay \
    && mkdir -p /run/docker/plugins /var/lib/pyoverlay

ENV PYOVERLAY_STATE_DIR=/var/lib/pyoverlay
ENTRYPOINT ["/opt/pyoverlay/bin/pyoverlay", "serve"]
