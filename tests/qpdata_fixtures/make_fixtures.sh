#!/usr/bin/env bash
# Regenerates tests/data/qpdata/<version>/{data.qpdata,expected.json}: QuPath's own qupath-core, compiled
# from its git tags, writes one data file per version (pathapp/WriteQpdata.java) and exports what it
# reads back as GeoJSON. Needs a JDK >= 21, a clone of github.com/qupath/qupath, and the jars of
# qupath-core's dependencies (JTS, Gson, Guava, commons-math3, picocli, slf4j-api, ImageJ).
#
#   QUPATH_GIT=/path/to/qupath JAVA_HOME=/path/to/jdk21 \
#   QUPATH_DEPS=jts.jar:gson.jar:guava.jar:commons-math3.jar:picocli.jar:slf4j-api.jar:ij.jar \
#   tests/qpdata_fixtures/make_fixtures.sh v0.2.3 v0.3.2 v0.4.4 v0.5.1 v0.6.0 v0.7.0
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/../data/qpdata"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for version in "$@"; do
    src="$work/$version"
    mkdir -p "$src"
    git -C "$QUPATH_GIT" archive "$version" qupath-core/src/main | tar -x -C "$src"
    java_src="$src/qupath-core/src/main/java"
    if [ -f "$java_src/qupath/lib/io/OpenCVTypeAdapters.java" ]; then
        python3 "$here/drop_opencv.py" "$java_src"
    fi
    "$JAVA_HOME/bin/javac" -nowarn -encoding UTF-8 --release 21 -implicit:class \
        -sourcepath "$java_src:$here/java" -cp "$QUPATH_DEPS" -d "$src/classes" "$here/java/pathapp/WriteQpdata.java"
    cp -r "$src/qupath-core/src/main/resources/." "$src/classes/" 2>/dev/null || true
    printf '%s' "${version#v}" > "$src/classes/VERSION"  # what a QuPath build stores (or puts in its jar manifest)
    rm -rf "${dest:?}/$version"
    "$JAVA_HOME/bin/java" -cp "$src/classes:$QUPATH_DEPS" pathapp.WriteQpdata "$dest/$version"
    echo "wrote $dest/$version"
done
