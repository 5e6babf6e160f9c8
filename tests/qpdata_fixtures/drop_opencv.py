"""QuPath 0.2/0.3's qupath-core uses OpenCV (JavaCPP) in two places that writing a data file and
exporting GeoJSON never reach, and JavaCPP is not installable here: BufferedImageTools' resize
method (its body becomes a throw) and GsonTools' OpenCV type adapters (not registered).
Usage: drop_opencv.py QUPATH_CORE_JAVA_DIR (edits that copy of the sources in place)."""

import re
import sys
from pathlib import Path

root = Path(sys.argv[1]) / "qupath" / "lib"
tools = root / "awt" / "common" / "BufferedImageTools.java"
text = re.sub(r"import org\.bytedeco\.[^\n]*\n", "", tools.read_text(encoding="utf-8"))
text, n = re.subn(
    r"\t\tMat matInput.*?return new BufferedImage\(img\.getColorModel\(\), raster2, img\.isAlphaPremultiplied\(\), null\);",
    'throw new UnsupportedOperationException("OpenCV resize is left out of the fixture build");',
    text,
    flags=re.S,
)
gson = root / "io" / "GsonTools.java"
gson_text, m = re.subn(r"\n\s*\.registerTypeAdapterFactory\(OpenCVTypeAdapters\.getOpenCVTypeAdaptorFactory\(\)\)", "", gson.read_text(encoding="utf-8"))
if n != 1 or m != 1:
    sys.exit(f"{root}: the OpenCV uses were not found where expected ({n}, {m})")
tools.write_text(text, encoding="utf-8")
gson.write_text(gson_text, encoding="utf-8")
(root / "io" / "OpenCVTypeAdapters.java").unlink()
