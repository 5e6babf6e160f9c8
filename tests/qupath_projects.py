"""A QuPath project over a real slide for tests: project.qpproj as QuPath writes it, and entries
whose data.qpdata QuPath's own code wrote (tests/data/qpdata/cmu1-upper-lower.qpdata: an "Upper"
annotation over y 0-1300 and a "Lower" one over y 1700-2967 of CMU-1-Small-Region.svs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import data_file

SVS = "wsi/aperio/CMU-1-Small-Region.svs"
ANNOTATED = Path(__file__).parent / "data" / "qpdata" / "cmu1-upper-lower.qpdata"


def annotated_project(root: Path, entries: int = 1, saved: int = 1) -> Path:
    """A project folder with `entries` entries of CMU-1-Small-Region.svs, the first `saved` of them
    with the Upper/Lower annotations (the others were never saved in QuPath: no data file). The image
    URIs point where the project "used to be", so pathapp finds the slide inside the project folder
    as QuPath does. Returns the project.qpproj path."""
    svs = data_file(SVS)
    root.mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / svs.name).symlink_to(svs)
    images = []
    for i in range(1, entries + 1):
        images.append({
            "serverBuilder": {
                "builderType": "uri",
                "providerClassName": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
                "uri": f"file:/elsewhere/images/{svs.name}",
                "args": [],
                "metadata": {"width": 2220, "height": 2967, "levels": [{"downsample": 1.0, "width": 2220, "height": 2967}],
                             "pixelCalibration": {"pixelWidth": {"value": 0.499, "unit": "µm"},
                                                  "pixelHeight": {"value": 0.499, "unit": "µm"}}},
            },
            "entryID": i,
            "randomizedName": f"entry-{i}",
            "imageName": f"slide {i}.svs",
            "metadata": {},
        })
        if i <= saved:
            (root / "data" / str(i)).mkdir(parents=True)
            shutil.copy(ANNOTATED, root / "data" / str(i) / "data.qpdata")
    qpproj = root / "project.qpproj"
    qpproj.write_text(json.dumps({"version": "0.6.0", "createTimestamp": 0, "modifyTimestamp": 0,
                                  "uri": "file:/elsewhere/project.qpproj", "lastID": entries, "images": images}),
                      encoding="utf-8")
    return qpproj
