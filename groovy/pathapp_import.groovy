/*
 * pathapp_import.groovy: import pathapp results that were already computed, image by image.
 *
 * Written against QuPath 0.4.4, 0.5.1 and 0.6.0. Open the project, then in the script editor use
 * Run > Run for project (QuPath saves each image after the script). For each image it looks for
 * tiles.geojson / annotations.geojson in, first to last:
 *   RESULTS_ROOT/<image name>/            when RESULTS_ROOT is set (e.g. `pathapp infer slides/ --out DIR`)
 *   <project>/pathapp/<entry ID>/         `pathapp infer project.qpproj`
 *   <project>/pathapp/<entry ID>/<image name>/   pathapp_run.groovy
 * It reads the results first, then replaces the objects an earlier pathapp import added (named
 * "pathapp...") and keeps yours, and resolves the hierarchy so your annotations count their tiles.
 * An image without results is skipped with a line in the log, and so is an image that QuPath shows
 * rotated, cropped or affine-transformed (pathapp's results are in the file's own coordinates).
 */
import static qupath.lib.gui.scripting.QPEx.*  // works with "Include default imports" switched off

import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

// ------------------------------------------------------------------------------- settings
// A folder holding one sub-folder per image (pathapp's --out); "" = only look inside the project
def RESULTS_ROOT = ""
// -------------------------------------------------------------------------- end of settings

def TAG = "pathapp"
def isPathapp = { obj -> obj.getName() != null && (obj.getName() == TAG || obj.getName().startsWith(TAG + ":")) }
// The output folder name pathapp gives a slide (pathapp.slide.Slide.name)
def slideStem = { File f ->
    def name = f.getName()
    def lower = name.toLowerCase()
    if (lower.endsWith(".ome.tiff")) return name.substring(0, name.length() - 9)
    if (lower.endsWith(".ome.tif")) return name.substring(0, name.length() - 8)
    if (f.isDirectory()) return name
    def dot = name.lastIndexOf(".")
    return dot > 0 ? name.substring(0, dot) : name
}

// QuPath shows some images moved: its RotatedImageServer, AffineTransformImageServer and
// CroppedImageServer name themselves in the server's path (createID, QuPath 0.4.4-0.6.0).
def movedBy = { String serverPath ->
    def kinds = []
    if (serverPath.contains("qupath.lib.images.servers.RotatedImageServer:") && serverPath =~ /\(Rotate=(90|180|270)\)/)
        kinds << "rotated"
    if (serverPath.contains("qupath.lib.images.servers.AffineTransformImageServer:"))
        kinds << "affine-transformed"
    if (serverPath.contains("qupath.lib.images.servers.CroppedImageServer:"))
        kinds << "cropped"
    return kinds
}

def entry = getProjectEntry()
if (getCurrentImageData() == null || entry == null)
    throw new RuntimeException("pathapp: open a project and use Run > Run for project")
def moved = movedBy(getCurrentServer().getPath())
if (!moved.isEmpty()) {
    println "pathapp: skipped entry " + entry.getID() + ": QuPath shows this image " + moved.join(" and ") + ", but pathapp's results are in the file's own coordinates and would land in the wrong place"
    return
}
def uris = getCurrentServer().getURIs()
def imagePath = uris.isEmpty() ? null : GeneralTools.toPath(uris.iterator().next())
def stem = null
if (imagePath != null) {
    def imageFile = imagePath.toFile()
    def lower = imageFile.getName().toLowerCase()
    if (lower.endsWith(".dcm") || lower.endsWith(".dicom"))
        imageFile = imageFile.getParentFile()  // DICOM-WSI results are named after the series folder
    stem = slideStem(imageFile)
}

def label = stem != null ? stem : "entry " + entry.getID()
def entryDir = new File(buildFilePath(PROJECT_BASE_DIR, "pathapp", entry.getID()))
def candidates = []
if (RESULTS_ROOT && stem != null) candidates << new File(RESULTS_ROOT, stem)
candidates << entryDir
if (stem != null) candidates << new File(entryDir, stem)
def resultDir = candidates.find { new File(it, "tiles.geojson").isFile() || new File(it, "annotations.geojson").isFile() }
if (resultDir == null) {
    println "pathapp: no results for " + label + " (looked in " + candidates.join(", ") + ")"
    return
}

def files = ["annotations.geojson", "tiles.geojson"].collect { new File(resultDir, it) }.findAll { it.isFile() }
def imported = []
files.each { f ->
    def objects = PathIO.readObjects(f)
    objects.each { it.setName(it.getPathClass() == null ? TAG : TAG + ": " + it.getPathClass().toString()) }
    imported.addAll(objects)
}
def previous = (getAnnotationObjects() + getDetectionObjects()).findAll { isPathapp(it) }
// PathObjectHierarchy.removeObjects(objects, keepChildren): QP's removeObjects(objects, true) is
// deprecated in 0.6, and its replacement removeObjects(objects) does not exist before 0.6.
getCurrentHierarchy().removeObjects(previous, true)
addObjects(imported)
resolveHierarchy()
fireHierarchyUpdate()
println "pathapp: " + label + ": replaced " + previous.size() + " pathapp objects with " + imported.size() + " from " + resultDir
