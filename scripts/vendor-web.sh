#!/usr/bin/env bash
# Refreshes the dashboard's vendored front-end files in src/vmbak/server/static/ from npm:
# htmx (htmx.org) and uPlot, at the versions pinned below, with their licenses. The files are
# committed, so vmbak needs neither npm nor a network to run; this script is only for updating
# them (then run the dashboard's tests: tests/server/test_dashboard_*.py). See docs/server.md.
set -euo pipefail
cd "$(dirname "$0")/.."
HTMX=2.0.11
UPLOT=1.6.32
dest=src/vmbak/server/static
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "htmx.org@$HTMX" "uplot@$UPLOT" >/dev/null)
mkdir -p "$work/htmx" "$work/uplot"
tar xzf "$work/htmx.org-$HTMX.tgz" -C "$work/htmx"
tar xzf "$work/uplot-$UPLOT.tgz" -C "$work/uplot"
cp "$work/htmx/package/dist/htmx.min.js" "$dest/htmx.min.js"
cp "$work/htmx/package/LICENSE" "$dest/LICENSE.htmx"
cp "$work/uplot/package/dist/uPlot.iife.min.js" "$work/uplot/package/dist/uPlot.min.css" "$dest/"
cp "$work/uplot/package/LICENSE" "$dest/LICENSE.uPlot"
echo "vendor-web: htmx $HTMX and uPlot $UPLOT in $dest"
