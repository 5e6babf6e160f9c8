/*
 * pathapp_run.groovy: run pathapp on the image open in QuPath, then show its results.
 *
 * Written against QuPath 0.4.4, 0.5.1 and 0.6.0 (kept to Groovy syntax that every QuPath since 0.4 parses).
 * What it does, in order:
 *   1. exports the selected annotations (or all annotations, or nothing = the whole image) as GeoJSON;
 *   2. runs `pathapp infer` out of process (a local install, or the pathapp container through
 *      docker), streaming pathapp's log into the QuPath log; a non-zero exit stops the script with
 *      an error that quotes pathapp's last lines;
 *   3. reads the new tiles and class regions, then replaces the objects an earlier pathapp run added
 *      (named "pathapp...") with them (a failed read leaves the earlier ones), resolves the hierarchy
 *      so your annotations count their tiles, and turns on a measurement map (heatmap) of one
 *      class's probability.
 MODEL may be a segmentation bundle (`pathapp train --method segment`): pathapp then outlines each class
 * inside the annotations you analyse (clipped to them) and writes no tiles. The script says so in the
 * log and files every region under the analysed annotation that covers it (the smallest one, as
 * QuPath's hierarchy does), or at the top level when it analysed the whole image; each region is an
 * annotation "pathapp: <class>" with "Area µm^2" and "Mean prob" (the class's mean probability in it)
 * in the measurement table. A rerun replaces the pathapp objects directly under the same annotations
 * (results under other annotations stay). QuPath's measurement maps colour detections only, so none
 * is turned on for regions.
 * With EXPLAIN set (e.g. "vitcx"), it runs `pathapp explain` instead: on the pathapp tiles you selected
 * (or, none selected, the EXPLAIN_TOP tiles with the highest probability of HEATMAP_CLASS), and shows
 * the saliency of every patch of those tiles as a measurement map ("saliency (0-1)"). Run it once
 * without EXPLAIN to get the tiles, select some, then run it with EXPLAIN.
 * Images that QuPath shows rotated, cropped or affine-transformed are refused: pathapp reads the
 * file as stored, and its results would land in the wrong place there.
 * Results are kept in <project>/pathapp/<entry ID>/<image name>/ (or the system temp folder when no
 * project is open). Use pathapp_import.groovy to import results computed earlier, image by image.
 * Edit the settings below, then Run (Automate > Script editor).
 */
import static qupath.lib.gui.scripting.QPEx.*  // works with "Include default imports" switched off

import qupath.lib.color.ColorMaps
import qupath.lib.common.GeneralTools
import qupath.lib.gui.tools.MeasurementMapper
import qupath.lib.io.PathIO

// ------------------------------------------------------------------------------- settings
// "local": an installed pathapp; "container": the pathapp image through docker (or podman)
def MODE = "local"
// Full path of the pathapp executable. QuPath started from a desktop menu may not see your shell's
// PATH: use e.g. "/home/me/miniforge3/envs/pathapp/bin/pathapp" or "C:\\Users\\me\\pathapp\\Scripts\\pathapp.exe"
def PATHAPP = "pathapp"
// Container mode: the docker (or podman) executable, the image, and "all" to give it the GPUs
def DOCKER = "docker"
def CONTAINER_IMAGE = "pathapp:latest"
def DOCKER_GPUS = ""
// Model bundle (.pathapp file): a tile classifier, or a segmentation bundle (see above). In container
// mode a path that does not exist here is taken to be inside the image (baked in at build time).
def MODEL = "/path/to/model.pathapp"
// Resolution (µm/px) and tile size (px) to analyse at; null = the bundle's own
def MPP = null
def TILE_SIZE = null
// "tile" or "detection": the QuPath object type of the per-tile results
def OBJECT_TYPE = "tile"
// Where to analyse: "auto" (selected annotations, else all annotations, else the whole image),
// "selected", "all" or "image"
def ROI_MODE = "auto"
// Class whose probability ("prob: <class>") colours the tiles; "" = the class of the first tile
def HEATMAP_CLASS = ""
def HEATMAP_COLORMAP = "Viridis"
// Anything else for `pathapp infer`, e.g. ["--device", "cuda", "--batch-size", "64"]
def EXTRA_ARGS = []
// Explain instead of classify: "vitcx" (ViT-CX), "rollout" or "attention"; "" = classify (pathapp infer)
def EXPLAIN = ""
// With EXPLAIN and no pathapp tiles selected: how many top tiles of HEATMAP_CLASS to explain
def EXPLAIN_TOP = 8
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
// Container paths: the same path on Linux and macOS; C:\x\y becomes /c/x/y (Docker Desktop)
def containerPath = { File f ->
    def p = f.getAbsolutePath()
    if (p ==~ /(?s)[A-Za-z]:.*/)
        return "/" + p.substring(0, 1).toLowerCase() + p.substring(2).replace("\\", "/")
    return p
}
def hostOrContainer = { File f -> MODE == "container" ? containerPath(f) : f.getAbsolutePath() }

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

// ---- settings that can be checked before any work
def colorMap = ColorMaps.getColorMaps().get(HEATMAP_COLORMAP)
if (colorMap == null)
    throw new RuntimeException("pathapp: HEATMAP_COLORMAP \"" + HEATMAP_COLORMAP + "\" is not a QuPath colour map; use one of " + ColorMaps.getColorMaps().keySet().join(", "))

// ---- the image and where its results go
def imageData = getCurrentImageData()
if (imageData == null)
    throw new RuntimeException("pathapp: open an image first")
def moved = movedBy(getCurrentServer().getPath())
if (!moved.isEmpty())
    throw new RuntimeException("pathapp: QuPath shows this image " + moved.join(" and ") + ", but pathapp reads the file as stored, so its results would land in the wrong place; add the image again without rotation or crop")
def uris = getCurrentServer().getURIs()
if (uris.size() > 1)
    throw new RuntimeException("pathapp: this image is made of " + uris.size() + " files (" + uris + "); pathapp needs one image file")
def imagePath = uris.isEmpty() ? null : GeneralTools.toPath(uris.iterator().next())
if (imagePath == null)
    throw new RuntimeException("pathapp: this image is not a local file (" + uris + "); pathapp needs the file")
def imageFile = imagePath.toFile()
def lowerName = imageFile.getName().toLowerCase()
if (lowerName.endsWith(".dcm") || lowerName.endsWith(".dicom"))
    imageFile = imageFile.getParentFile()  // DICOM-WSI: pathapp opens the series folder
def outRoot
if (getProject() != null && getProjectEntry() != null)
    outRoot = new File(buildFilePath(PROJECT_BASE_DIR, "pathapp", getProjectEntry().getID()))
else
    outRoot = new File(System.getProperty("java.io.tmpdir"), "pathapp-out")
mkdirs(outRoot.getAbsolutePath())

// ---- the regions to analyse
def explaining = EXPLAIN != ""
def isSaliency = { obj -> obj.getName() != null && obj.getName().startsWith(TAG + ": saliency") }
def rois = []
if (explaining) {
    rois = getSelectedObjects().findAll { isPathapp(it) && !it.isAnnotation() && !isSaliency(it) }
    println "pathapp: explaining " + (rois.isEmpty() ? "the top " + EXPLAIN_TOP + " tiles" : rois.size() + " selected tile(s)")
} else if (ROI_MODE == "selected" || ROI_MODE == "auto")
    rois = getSelectedObjects().findAll { it.isAnnotation() && !isPathapp(it) }
if (!explaining && rois.isEmpty() && (ROI_MODE == "all" || ROI_MODE == "auto"))
    rois = getAnnotationObjects().findAll { !isPathapp(it) }
if (!explaining && rois.isEmpty() && ROI_MODE in ["selected", "all"])
    throw new RuntimeException("pathapp: no annotations to analyse (ROI_MODE = " + ROI_MODE + "); draw or select some, or set ROI_MODE = \"image\"")
def roiFile = null
if (!rois.isEmpty()) {
    roiFile = new File(outRoot, "rois.geojson")
    exportObjectsToGeoJson(rois, roiFile.getAbsolutePath(), "FEATURE_COLLECTION")
    println "pathapp: analysing inside " + rois.size() + " object(s)"
} else if (!explaining) {
    println "pathapp: no annotations: analysing the whole image (tissue only)"
}

// ---- the command
def modelFile = new File(MODEL)
def args = [explaining ? "explain" : "infer", hostOrContainer(imageFile),
            "--model", (MODE == "container" && !modelFile.exists()) ? MODEL : hostOrContainer(modelFile),
            "--out", hostOrContainer(outRoot)]
if (explaining) {
    args += ["--method", EXPLAIN]
    if (roiFile == null) args += ["--top", EXPLAIN_TOP.toString()] + (HEATMAP_CLASS ? ["--class", HEATMAP_CLASS] : [])
} else {
    args += ["--object-type", OBJECT_TYPE, "--overwrite"]
}
if (MPP != null) args += ["--mpp", MPP.toString()]
if (TILE_SIZE != null) args += ["--tile-size", TILE_SIZE.toString()]
if (roiFile != null) args += ["--roi", hostOrContainer(roiFile)]
args += EXTRA_ARGS.collect { it.toString() }

def command
if (MODE == "local") {
    command = [PATHAPP] + args
} else if (MODE == "container") {
    // every folder pathapp reads or writes is mounted at the same path inside the container
    def mounts = [(imageFile.isDirectory() ? imageFile : imageFile.getParentFile()): "ro", (outRoot): "rw"]
    if (modelFile.exists()) mounts[modelFile.getAbsoluteFile().getParentFile()] = "ro"
    command = [DOCKER, "run", "--rm", "-e", "TQDM_MININTERVAL=5"]
    if (DOCKER_GPUS) command += ["--gpus", DOCKER_GPUS]
    if (!System.getProperty("os.name").toLowerCase().contains("windows")) {
        // write the results as you, not as the container's user
        def uid = ["id", "-u"].execute().text.trim()
        def gid = ["id", "-g"].execute().text.trim()
        command += ["--user", uid + ":" + gid, "-e", "HOME=/tmp"]  // that user has no home in the image
    }
    mounts.each { dir, access -> command += ["-v", dir.getAbsolutePath() + ":" + containerPath(dir) + ":" + access] }
    command += [CONTAINER_IMAGE] + args
} else {
    throw new RuntimeException("pathapp: MODE must be \"local\" or \"container\", not \"" + MODE + "\"")
}

// ---- run it, streaming its log
println "pathapp: " + command.join(" ")
def builder = new ProcessBuilder(command.collect { it.toString() }).redirectErrorStream(true)
builder.environment().put("TQDM_MININTERVAL", "5")  // a progress line (tiles/s) every 5 s
def process
try {
    process = builder.start()
} catch (IOException e) {
    def exe = MODE == "local" ? "PATHAPP" : "DOCKER"
    throw new RuntimeException("pathapp: could not start " + command[0] + " (" + e.getMessage() + "); set " + exe + " at the top of this script to its full path")
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

// ---- import: read the new results, then replace what an earlier run added (an explanation: an earlier
// explanation); keep everything else
def resultDir = new File(outRoot, slideStem(imageFile))
def names = explaining ? ["saliency-" + EXPLAIN + ".geojson"] : ["annotations.geojson", "tiles.geojson"]
def files = names.collect { new File(resultDir, it) }.findAll { it.isFile() }
if (files.isEmpty())
    throw new RuntimeException("pathapp: finished but found no " + names.join(" or ") + " in " + resultDir)
def imported = []
files.each { f ->
    def objects = PathIO.readObjects(f)
    if (explaining)
        objects.each { it.setName(TAG + ": saliency " + EXPLAIN) }
    else
        objects.each { it.setName(it.getPathClass() == null ? TAG : TAG + ": " + it.getPathClass().toString()) }
    imported.addAll(objects)
    println "pathapp: " + objects.size() + " objects from " + f
}
// A segmentation bundle's results have no tiles.geojson (pathapp.results.run.write_results): its
// regions go under the smallest analysed annotation that covers each (pathapp clipped them a hair
// inside), replacing the pathapp objects directly under those annotations, or under the image's root
def segmentation = !explaining && !new File(resultDir, "tiles.geojson").isFile()
def root = getCurrentHierarchy().getRootObject()
def parents = rois.sort(false) { it.getROI().getArea() }
def previous
if (segmentation)
    previous = (parents.isEmpty() ? [root] : parents).collectMany { p -> p.getChildObjects().findAll { isPathapp(it) } }
else
    previous = (getAnnotationObjects() + getDetectionObjects()).findAll { explaining ? isSaliency(it) : isPathapp(it) }
// PathObjectHierarchy.removeObjects(objects, keepChildren): QP's removeObjects(objects, true) is
// deprecated in 0.6, and its replacement removeObjects(objects) does not exist before 0.6.
getCurrentHierarchy().removeObjects(previous, true)
if (segmentation) {
    def outlines = parents.collect { it.getROI().getGeometry() }
    def loose = 0
    imported.each { region ->
        def outline = region.getROI().getGeometry()
        def i = outlines.findIndexOf { it.covers(outline) }
        if (i < 0 && !parents.isEmpty()) loose++
        getCurrentHierarchy().addObjectBelowParent(i >= 0 ? parents[i] : root, region, false)
    }
    println "pathapp: segmentation bundle: " + imported.size() + " regions under " +
            (parents.isEmpty() ? "the image" : parents.size() + " annotation(s)") +
            (loose ? "; " + loose + " lie across overlapping annotations and went to the top level" : "")
} else {
    addObjects(imported)
    resolveHierarchy()
}
fireHierarchyUpdate()

// ---- heatmap: colour the tiles by one class's probability, or the patches by their saliency
def tiles = getDetectionObjects().findAll { explaining ? isSaliency(it) : (isPathapp(it) && !isSaliency(it)) }
def measurement = "saliency (0-1)"
if (!explaining) {
    def heatClass = HEATMAP_CLASS
    if (!heatClass) {
        def first = tiles.find { it.getPathClass() != null }
        heatClass = first == null ? "" : first.getPathClass().toString()
    }
    measurement = heatClass ? "prob: " + heatClass : ""
}
def viewer = getCurrentViewer()
if (segmentation)
    println "pathapp: regions are annotations, which measurement maps do not colour; see \"Mean prob\" in the measurement table"
else if (viewer != null && measurement && !tiles.isEmpty()) {
    def mapper = new MeasurementMapper(colorMap, measurement, tiles)
    mapper.setDisplayMinValue(0.0d)
    mapper.setDisplayMaxValue(1.0d)
    viewer.getOverlayOptions().setMeasurementMapper(mapper)
    println "pathapp: measurement map \"" + measurement + "\" on " + tiles.size() + " objects"
}
println "pathapp: done; removed " + previous.size() + " earlier pathapp objects, added " + imported.size()
