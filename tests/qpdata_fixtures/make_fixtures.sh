#!/usr/bin/env bash
# Regenerates tests/data/qpdata with QuPath's own qupath-core, compiled from its git tags:
#  - <version>/data.qpdata, <version>/expected.json: WriteQpdata.java writes one data file per version
#    through PathIO and exports what QuPath reads back from it as QuPath GeoJSON;
#  - real/<name>.json: ReadQpdata.java's summary of what QuPath reads from the real projects in
#    ../shared/data/qupath (btc-lab entry 106 with QuPath 0.5.1, coscia entry 1 with 0.6.0);
#  - cmu1-upper-lower.qpdata: two classified annotations (WriteAnnotations.java, QuPath 0.6.0) over
#    ../shared/data/wsi/aperio/CMU-1-Small-Region.svs, for the train/infer/pretrain tests on a project.
# Needs a JDK >= 21, a clone of github.com/qupath/qupath, and the jars of qupath-core's dependencies
# (JTS, Gson, Guava, commons-math3, picocli, slf4j-api, ImageJ):
#
#   QUPATH_GIT=/path/to/qupath JAVA_HOME=/path/to/jdk21 \
#   QUPATH_DEPS=jts.jar:gson.jar:guava.jar:commons-math3.jar:picocli.jar:slf4j-api.jar:ij.jar \
#   tests/qpdata_fixtures/make_fixtures.sh v0.2.3 v0.3.2 v0.4.4 v0.5.1 v0.6.0 v0.7.0
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/../data/qpdata"
shared="$here/../../../shared/data/qupath"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

build() {  # build VERSION: compile qupath-core at that tag with the two fixture programs
    local version=$1 src="$work/$1"
    [ -d "$src/classes" ] && return
    mkdir -p "$src"
    git -C "$QUPATH_GIT" archive "$version" qupath-core/src/main | tar -x -C "$src"
    local java_src="$src/qupath-core/src/main/java"
    if [ -f "$java_src/qupath/lib/io/OpenCVTypeAdapters.java" ]; then
        python3 "$here/drop_opencv.py" "$java_src"
    fi
    "$JAVA_HOME/bin/javac" -nowarn -encoding UTF-8 --release 21 -implicit:class -sourcepath "$java_src:$here/java" \
        -cp "$QUPATH_DEPS" -d "$src/classes" "$here"/java/pathapp/*.java
    cp -r "$src/qupath-core/src/main/resources/." "$src/classes/" 2>/dev/null || true
    printf '%s' "${version#v}" > "$src/classes/VERSION"  # what a QuPath build stores (or puts in its jar manifest)
}

run() {  # run VERSION CLASS ARGS...
    local version=$1 cls=$2
    shift 2
    build "$version"
    "$JAVA_HOME/bin/java" -cp "$work/$version/classes:$QUPATH_DEPS" "pathapp.$cls" "$@"
}

for version in "$@"; do
    rm -rf "${dest:?}/$version"
    run "$version" WriteQpdata "$dest/$version"
    echo "wrote $dest/$version"
done
mkdir -p "$dest/real"
run v0.5.1 ReadQpdata "$shared/btc-lab-he-project/data/106/data.qpdata" "$dest/real/btc-lab-106.json"
run v0.6.0 ReadQpdata "$shared/coscia-demo-project/data/1/data.qpdata" "$dest/real/coscia-1.json"
echo "wrote $dest/real"
run v0.6.0 WriteAnnotations "$dest/cmu1-upper-lower.qpdata" "Upper:0,0,2220,1300" "Lower:0,1700,2220,1267"
echo "wrote $dest/cmu1-upper-lower.qpdata"
