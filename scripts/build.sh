#!/usr/bin/env bash
# Configures and builds shardprop (Release) in ./build, or in $BUILD_DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/stages.sh
. "$root/scripts/stages.sh"
stage_build plain
