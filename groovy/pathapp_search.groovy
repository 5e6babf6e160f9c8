/*
 * pathapp_search.groovy: find tissue that looks like the selected annotation, in a pathapp index.
 *
 * Written against QuPath 0.4.4, 0.5.1 and 0.6.0 (kept to Groovy syntax that every QuPath since 0.4 parses).
 * What it does, in order:
 *   1. exports the selected annotation(s) of the open image as GeoJSON;
 *   2. runs `pathapp search INDEX --query <this image> --roi <that file>` out of process, streaming
 *      pathapp's log into the QuPath log; a non-zero exit stops the script with pathapp's last lines;
 *   3. opens the mosaic (the query beside its hits) in an ImageJ window;
 *   4. replaces the hits an earlier search added to this image (named "pathapp search...") with the
 *      hits of this search that lie in this image, as detections with a "similarity" measurement.
 * Hits in other slides are listed in hits.csv and have their own GeoJSON in the results folder:
 * <project>/pathapp/<entry ID>/search/ (or the system temp folder when no project is open).
 * Build the index first, e.g. `pathapp index add idx/ slides/ --model m.pathapp`.
 * Edit the settings below, select an annotation, then Run (Automate > Script editor).
 */
import static qupath.lib.gui.scripting.QPEx.*  // works with "Include default imports" switched off

import ij.IJ
import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

// ------------------------------------------------------------------------------- settings
// Full path of the pathapp executable (QuPath started from a desktop menu may not see your PATH)
def PATHAPP = "pathapp"
// The index: a folder made by `pathapp index add`, or qdrant://host:6333/collection
def INDEX = "/path/to/index"
// The model the index was built with; null = the one the index recorded
def MODEL = null
// Number of hits, and what to rank: "tile" (similar tiles) or "slide" (similar slides)
def K = 20
def LEVEL = "tile"
// true: leave out hits from this image's own case (its `case` in the index's --meta CSV)
def EXCLUDE_CASE = false
// The image's µm/px when its file does not record it; null = the file's
def SLIDE_MPP = null
// Anything else for `pathapp search`, e.g. ["--device", "cuda"]
def EXTRA_ARGS = []
// -------------------------------------------------------------------------- end of settings

def TAG = "pathapp search"
def isSearchHit = { obj -> obj.getName() != null && obj.getName().startsWith(TAG) }

// ---- the image, the query and where the results go
def imageData = getCurrentImageData()
if (imageData == null)
    throw new RuntimeException("pathapp: open an image first")
def uris = getCurrentServer().getURIs()
def imagePath = uris.isEmpty() ? null : GeneralTools.toPath(uris.iterator().next())
if (imagePath == null)
    throw new RuntimeException("pathapp: this image is not a local file (" + uris + "); pathapp needs the file")
def imageFile = imagePath.toFile()
def lowerName = imageFile.getName().toLowerCase()
if (lowerName.endsWith(".dcm") || lowerName.endsWith(".dicom"))
    imageFile = imageFile.getParentFile()  // DICOM-WSI: pathapp opens the series folder
def query = getSelectedObjects().findAll { it.isAnnotation() && !isSearchHit(it) }
if (query.isEmpty())
    throw new RuntimeException("pathapp: select the annotation to search with (draw one around the tissue of interest)")
def outDir
if (getProject() != null && getProjectEntry() != null)
    outDir = new File(buildFilePath(PROJECT_BASE_DIR, "pathapp", getProjectEntry().getID(), "search"))
else
    outDir = new File(System.getProperty("java.io.tmpdir"), "pathapp-search")
mkdirs(outDir.getAbsolutePath())
def roiFile = new File(outDir, "query.geojson")
exportObjectsToGeoJson(query, roiFile.getAbsolutePath(), "FEATURE_COLLECTION")

// ---- the command
def command = [PATHAPP, "search", INDEX, "--query", imageFile.getAbsolutePath(), "--roi", roiFile.getAbsolutePath(),
               "--k", K.toString(), "--level", LEVEL, "--out", outDir.getAbsolutePath()]
if (MODEL != null) command += ["--model", MODEL]
if (SLIDE_MPP != null) command += ["--slide-mpp", SLIDE_MPP.toString()]
if (EXCLUDE_CASE) command += ["--exclude-case"]
command += EXTRA_ARGS.collect { it.toString() }

// ---- run it, streaming its log
println "pathapp: " + command.join(" ")
def builder = new ProcessBuilder(command.collect { it.toString() }).redirectErrorStream(true)
builder.environment().put("TQDM_MININTERVAL", "5")
def process
try {
    process = builder.start()
} catch (IOException e) {
    throw new RuntimeException("pathapp: could not start " + command[0] + " (" + e.getMessage() + "); set PATHAPP at the top of this script to its full path")
}
def lastLines = new LinkedList<String>()
process.getInputStream().withReader("UTF-8") { reader ->
    String line
    while ((line = reader.readLine()) != null) {
        println "pathapp | " + line
        lastLines.add(line)
        if (lastLines.size() > 5) lastLines.removeFirst()
    }
}
def exitCode = process.waitFor()
if (exitCode != 0)
    throw new RuntimeException("pathapp failed (exit code " + exitCode + "): " + lastLines.join(" / "))

// ---- the mosaic: the query beside its hits
def mosaic = new File(outDir, "mosaic.png")
def picture = IJ.openImage(mosaic.getAbsolutePath())
if (picture != null)
    picture.show()
println "pathapp: mosaic " + mosaic + ", table " + new File(outDir, "hits.csv")

// ---- the hits in this image, as detections
def found = new groovy.json.JsonSlurper().parse(new File(outDir, "hits.json"))
def here = found.slides.find { new File(it.slide_path).getCanonicalFile() == imageFile.getCanonicalFile() }
def previous = getDetectionObjects().findAll { isSearchHit(it) }
// PathObjectHierarchy.removeObjects(objects, keepChildren): QP's removeObjects(objects, true) is
// deprecated in 0.6, and its replacement removeObjects(objects) does not exist before 0.6.
getCurrentHierarchy().removeObjects(previous, true)
def hits = here == null ? [] : PathIO.readObjects(new File(outDir, here.geojson))
addObjects(hits)
resolveHierarchy()
fireHierarchyUpdate()
println "pathapp: " + hits.size() + " hit tiles in this image (of " + found.slides.size() + " slides with hits); removed " + previous.size() + " earlier hits"
