#!/bin/bash
# Runs the cc_binary and checks the genrule output, both from runfiles.
set -euo pipefail

out="$(hello/hello kiln)"
if [[ "$out" != "hello, kiln" ]]; then
  echo "unexpected output from hello: '$out'" >&2
  exit 1
fi

greeting="$(cat hello/greeting.txt)"
if [[ "$greeting" != "hello from a genrule" ]]; then
  echo "unexpected greeting.txt: '$greeting'" >&2
  exit 1
fi
echo PASS
