#!/bin/bash
# Build kube-apiserver v1.20.2 for the real-API-server test tier, once per machine.
#
# No package registry ships a kube-apiserver binary, and the Go module proxy may be out of reach,
# so this builds it from Debian bookworm's `kubernetes` source package, which carries the whole
# tree with vendor/, using Debian's Go in GOPATH mode (as Kubernetes 1.20's own build did).
# etcd and etcdctl come from Debian's etcd-server and etcd-client packages.
#
#   OUTGATE_REALKUBE_CACHE   where the result is kept (default ~/.cache/outgate-realkube):
#                            bin/kube-apiserver (about 110 MB) and the source tarball (34 MB)
#
# Costs on 2 cores: about 5 minutes of CPU at nice 19, 1.3 GB of memory and 1.6 GB of disk while
# building; the Go build cache and the unpacked tree are removed afterwards.
# A second run with the binary in place only checks the packages and exits.
set -euo pipefail

VERSION=v1.20.2
CACHE=${OUTGATE_REALKUBE_CACHE:-$HOME/.cache/outgate-realkube}
BIN=$CACHE/bin/kube-apiserver
SOURCE_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
export DEBIAN_FRONTEND=noninteractive

say() { echo "build-apiserver: $*" >&2; }

missing=()
command -v go >/dev/null || missing+=(golang-go)
test -x /usr/bin/etcd || missing+=(etcd-server)
test -x /usr/bin/etcdctl || missing+=(etcd-client)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-cache policy etcd-server 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -x "$BIN" ] && [ "$("$BIN" --version 2>/dev/null)" = "Kubernetes $VERSION" ]; then
    exit 0
fi

mkdir -p "$CACHE/bin" "$CACHE/downloads"
cd "$CACHE/downloads"

# The source package through a private deb-src list, so the system's apt sources stay as they are.
tarball=$(ls kubernetes_*.orig.tar.gz 2>/dev/null | head -n1 || true)
if [ -z "$tarball" ]; then
    apt_dir=$CACHE/apt
    mkdir -p "$apt_dir/sources" "$apt_dir/lists/partial"
    {
        echo "Types: deb-src"
        echo "URIs: http://deb.debian.org/debian"
        echo "Suites: bookworm bookworm-updates"
        echo "Components: main"
        echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    } >"$apt_dir/sources/kubernetes-src.sources"
    apt_options=(
        -o Dir::Etc::SourceList=/dev/null
        -o "Dir::Etc::SourceParts=$apt_dir/sources"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o Dir::Cache::pkgcache=
        -o "Dir::Cache::srcpkgcache=$apt_dir/srcpkgcache.bin"
    )
    say "downloading Debian's kubernetes source package"
    apt-get "${apt_options[@]}" update -qq
    apt-get "${apt_options[@]}" source --download-only -qq kubernetes 2>&1 | grep -v unsandboxed >&2 || true
    tarball=$(ls kubernetes_*.orig.tar.gz | head -n1)
fi
if ! echo "$SOURCE_SHA256  $tarball" | sha256sum --check --quiet --status; then
    say "note: $tarball is not the 1.20.2 tarball this script was written for; building it anyway"
fi
reflect2_deb=$(ls golang-github-modern-go-reflect2-dev_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$reflect2_deb" ]; then
    apt-get download -qq golang-github-modern-go-reflect2-dev 2>&1 | grep -v unsandboxed >&2 || true
    reflect2_deb=$(ls golang-github-modern-go-reflect2-dev_*.deb | head -n1)
fi

work=$(mktemp -d "$CACHE/build.XXXXXX")
cleanup() { chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export GOPATH=$work/gopath GOCACHE=$work/gocache GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
tree=$GOPATH/src/k8s.io/kubernetes
mkdir -p "$tree"
say "unpacking $tarball"
tar -xzf "$tarball" -C "$tree" --strip-components=1
cd "$tree"

# The vendored reflect2 1.0.1 depends on Go runtime map internals that changed in Go 1.18;
# Debian's 1.0.2 is the release that fixed it.
dpkg-deb -x "$CACHE/downloads/$reflect2_deb" "$work/reflect2"
rm -rf vendor/github.com/modern-go/reflect2
cp -r "$work/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2" vendor/github.com/modern-go/
rm -f vendor/github.com/modern-go/reflect2/*_test.go

# pkg/generated/openapi is produced by Kubernetes' Makefile, not shipped in the tarball:
# generate it from every package tagged for openapi-gen.
say "generating the OpenAPI definitions"
nice -n 19 go build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
# -R: vendor/k8s.io/* are symbolic links into staging/, and their packages count too.
packages=$(grep -Rl --include='*.go' -E '^// *\+k8s:openapi-gen=' cmd pkg plugin third_party vendor 2>/dev/null |
    grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' |
    xargs -n1 dirname | LC_ALL=C sort -u | sed 's#^#k8s.io/kubernetes/#' | paste -sd, -)
nice -n 19 "$work/openapi-gen" --logtostderr -i "$packages" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    -r "$work/openapi-violations.report" 2>"$work/openapi-gen.log"

say "compiling kube-apiserver $VERSION (several minutes)"
ldflags="-s -w"
for package in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags+=" -X $package.gitVersion=$VERSION -X $package.gitMajor=1 -X $package.gitMinor=20"
    ldflags+=" -X $package.gitTreeState=clean"
done
nice -n 19 go build -tags selinux,notest -trimpath -ldflags "$ldflags" -o "$BIN.partial" ./cmd/kube-apiserver
mv "$BIN.partial" "$BIN"
"$BIN" --version >&2
