#!/bin/sh
# The webhook's serving certificate without cert-manager (docs/webhooks.md, "Without
# cert-manager"): a CA and a serving certificate for outgate-webhook.NAMESPACE.svc made with
# openssl in DIR, then, with --apply, the Secret outgate-webhook-tls created or replaced and the
# CA written into the caBundle of both webhook configurations.
#
#   webhook-certs.sh [--namespace outgate-system] [--dir ./webhook-certs] [--days 365] [--apply]
#
# Run it again before the certificate expires (--days): the webhook re-reads the Secret's files
# when the kubelet updates them, and the CA is replaced in the configurations at the same time.
set -eu

namespace=outgate-system
dir=./webhook-certs
days=365
apply=false
while [ $# -gt 0 ]; do
    case "$1" in
        --namespace) namespace=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --days) days=$2; shift 2 ;;
        --apply) apply=true; shift ;;
        *) echo "usage: $0 [--namespace NS] [--dir DIR] [--days N] [--apply]" >&2; exit 2 ;;
    esac
done

service=outgate-webhook.$namespace.svc
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=outgate-webhook-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$service" \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.cluster.local\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n' \
    "$service" "$service" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
rm -f "$dir/tls.csr" "$dir/ext.cnf" "$dir/ca.srl"
echo "wrote $dir/ca.crt, $dir/tls.crt and $dir/tls.key for $service"

if [ "$apply" = true ]; then
    kubectl -n "$namespace" create secret tls outgate-webhook-tls \
        --cert="$dir/tls.crt" --key="$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
    bundle=$(base64 < "$dir/ca.crt" | tr -d '\n')
    kubectl patch validatingwebhookconfiguration outgate-policies --type=json \
        -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"}]"
    kubectl patch mutatingwebhookconfiguration outgate-inject --type=json \
        -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"},{\"op\":\"add\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$bundle\"}]"
fi
