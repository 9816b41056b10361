#!/usr/bin/env bash
# CI's build job, run by .ci/run after the tests: `edgesdk build` on the tiny-model matrix of
# ci/tiny/build.yaml (CPU, DirectML and QNN targets), signed, one model packaged; then a rebuild that
# must be all cached and byte-identical, `edgesdk verify` of every output, and the package loaded
# and run. Uses the python on PATH (the CI venv). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgesdk-ci-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
cp ci/tiny/build.yaml "$WORK/build.yaml"
$PY ci/tiny/make_models.py "$WORK"
$PY - "$WORK/key.pem" <<'PYEOF'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], "wb").write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
open(sys.argv[1][:-4] + ".pub.pem", "wb").write(
    key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
PYEOF
$PY -m edgesdk build "$WORK/build.yaml" --list
$PY -m edgesdk build "$WORK/build.yaml" --sign-key "$WORK/key.pem"
$PY -m edgesdk package "$WORK"/dist/llama-*/ -o "$WORK/llama.ortpackage"   # one model, a variant per target
# (a signature is not reproducible: ECDSA signs with a fresh nonce; what it signs is)
( cd "$WORK/dist" && find . -type f ! -name model.sig -print0 | sort -z \
  | xargs -0 sha256sum ) > "$WORK/first.sha256"
# unchanged inputs: every entry comes from the cache, and every byte is the same
$PY -m edgesdk build "$WORK/build.yaml" --sign-key "$WORK/key.pem" | tee "$WORK/second.log"
grep -q "6 entries: 0 built, 6 cached, 0 failed" "$WORK/second.log"
( cd "$WORK/dist" && sha256sum --quiet --strict -c "$WORK/first.sha256" ) || { echo "ci: a rebuild changed bytes" >&2; exit 1; }
for art in "$WORK"/dist/*-*-*/; do
  echo "== $(basename "$art")"
  $PY -m edgesdk verify "$art" --key "$WORK/key.pub.pem"
done
$PY - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
import edgesdk
work = Path(sys.argv[1])
model = edgesdk.load(work / "llama.ortpackage", public_key=work / "key.pub.pem")
r = model.generate("Hello", max_new_tokens=8)
assert r.generated_tokens >= 1, r
print(f"ci: package variant {model.path.name} generated {r.generated_tokens} tokens")
PYEOF
echo "ci: tiny-model build matrix built, cached, verified and packaged"
