// Runs one of groovy/pathapp_*.groovy outside QuPath, with a small stand-in for the QuPath scripting
// functions it calls (QuPath cannot be installed here). The script's own code runs unchanged: it
// exports ROIs, starts the real pathapp (or the docker command), reads its GeoJSON and edits the
// stand-in hierarchy, whose final state is written out for the Python test to check.
//
// Usage: groovy -cp /usr/share/java/jts-core.jar run_in_stand_in.groovy SCRIPT CONFIG.json
// CONFIG: settings {NAME: value} replacing the script's `def NAME = ...` lines; image (path);
// server_path (optional: what the image server's getPath() answers; QuPath's transforming servers
// name themselves there); project_dir (or null); entry_id; hierarchy (GeoJSON features,
// properties.selected marks selection, properties.parent the index of the parent feature, else the
// root); state_out (where to write the final hierarchy, parent links included, and the calls).
// Only QuPath's own calls are provided: a script calling QP.removeObjects(objects, true), deprecated
// in 0.6, fails here (the hierarchy's removeObjects is provided instead).
// Objects have parents and children as in PathObjectHierarchy (removeObjects(objects, true) hands an
// object's children to its parent; addObjectBelowParent adds under the given parent; addObjects under
// the root; resolveHierarchy is only recorded). ROI geometry is real JTS (the library QuPath's ROIs
// use), built as QuPath builds it from GeoJSON: a polygon without holes becomes a PolygonROI, whose
// vertices are floats; other shapes keep doubles (GeometryTools.geometryToROI, 0.4.4-0.6.0).
import groovy.json.JsonOutput
import groovy.json.JsonSlurper

def (scriptPath, configPath) = args
def config = new JsonSlurper().parse(new File(configPath))
def text = new File(scriptPath).getText("UTF-8")
config.settings.each { name, value ->
    def line = java.util.regex.Pattern.compile("(?m)^def " + name + " = .*\$")
    assert line.matcher(text).find(): "setting " + name + " not found in " + scriptPath
    text = line.matcher(text).replaceFirst(java.util.regex.Matcher.quoteReplacement("def " + name + " = " + toGroovy(value)))
}
text = text.readLines().findAll { !(it ==~ /^import (static )?(qupath|ij)\..*/) }.join("\n")

static String toGroovy(value) {
    if (value == null) return "null"
    if (value instanceof String) return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if (value instanceof List) return "[" + value.collect { toGroovy(it) }.join(", ") + "]"
    return value.toString()
}

// --- the stand-in: only what the scripts call
def stubs = '''
class StandInObject {
    String id = UUID.randomUUID().toString()
    String objectType; String className; String name; boolean selected; Map geometry; Map measurements = [:]
    def parent; List children = []
    boolean isAnnotation() { objectType == "annotation" }
    boolean isRootObject() { objectType == "root" }
    String getName() { name }
    void setName(String n) { name = n }
    def getPathClass() { className }
    def getParent() { parent }
    Collection getChildObjects() { new ArrayList(children) }
    def getROI() { geometry == null ? null : new StandInROI(geometry: StandInROI.jts(geometry)) }
    void moveTo(newParent) { parent?.children?.remove(this); parent = newParent; newParent?.children?.add(this) }
}
class StandInROI {
    def geometry
    def getGeometry() { geometry }
    double getArea() { geometry.getArea() }
    static def jts(Map g) {
        def f = new org.locationtech.jts.geom.GeometryFactory()
        def ring = { List c, boolean floats -> f.createLinearRing(c.collect {
            floats ? new org.locationtech.jts.geom.Coordinate((double) (float) it[0], (double) (float) it[1])
                   : new org.locationtech.jts.geom.Coordinate(it[0] as double, it[1] as double) } as org.locationtech.jts.geom.Coordinate[]) }
        def polygon = { List rings, boolean floats -> f.createPolygon(ring(rings[0], floats),
            rings.drop(1).collect { ring(it, floats) } as org.locationtech.jts.geom.LinearRing[]) }
        if (g.type == "Polygon") return polygon(g.coordinates, g.coordinates.size() == 1)
        if (g.type == "MultiPolygon")
            return f.createMultiPolygon(g.coordinates.collect { polygon(it, false) } as org.locationtech.jts.geom.Polygon[])
        throw new IllegalArgumentException("stand-in: no ROI for " + g.type)
    }
}
class GeneralTools { static java.nio.file.Path toPath(URI uri) { java.nio.file.Paths.get(uri) } }
class PathIO {
    static List readObjects(File f) {
        new groovy.json.JsonSlurper().parse(f).features.collect { feat ->
            new StandInObject(objectType: feat.properties.objectType, className: feat.properties.classification?.name,
                              name: feat.properties.name, geometry: feat.geometry,
                              measurements: feat.properties.measurements ?: [:])
        }
    }
}
class IJ {  // ImageJ 1.x, bundled with QuPath: says what it would open
    static def openImage(String path) { println "IJ.openImage " + path; return new IJImage(path: path) }
}
class IJImage { String path; void show() { println "IJ.show " + path } }
class ColorMaps { static Map getColorMaps() { [Viridis: "Viridis colour map", Magma: "Magma colour map"] } }
class MeasurementMapper {
    static List made = []
    def colorMap; String measurement; Collection objects; double min; double max
    MeasurementMapper(colorMap, String measurement, Collection objects) {
        this.colorMap = colorMap; this.measurement = measurement; this.objects = objects; made << this
    }
    void setDisplayMinValue(double v) { min = v }
    void setDisplayMaxValue(double v) { max = v }
}
'''

def standInClass = new GroovyShell().evaluate(stubs + "\nreturn StandInObject")
def root = standInClass.newInstance(objectType: "root")
def hierarchy = config.hierarchy.collect { f ->
    standInClass.newInstance(
        objectType: f.properties.objectType ?: "annotation", className: f.properties.classification?.name,
        name: f.properties.name, selected: f.properties.selected ?: false, geometry: f.geometry)
}
config.hierarchy.eachWithIndex { f, i -> hierarchy[i].moveTo(f.properties.parent == null ? root : hierarchy[f.properties.parent]) }
def calls = []
def projectDir = config.project_dir
def imageUri = new File(config.image).toURI()
def overlay = [mapper: null]
def binding = new Binding([
    getCurrentImageData : { -> [imageData: true] },
    getCurrentServer    : { -> [getURIs: { -> [imageUri] }, getPath: { -> config.server_path ?: imageUri.toString() }] },
    getProject          : { -> projectDir == null ? null : [getPath: { -> new File(projectDir, "project.qpproj").toPath() }] },
    getProjectEntry     : { -> projectDir == null ? null : [getID: { -> config.entry_id.toString() }] },
    PROJECT_BASE_DIR    : "{%PROJECT}",
    buildFilePath       : { String... parts -> parts.collect { it == "{%PROJECT}" ? projectDir : it }.join(File.separator) },
    mkdirs              : { String p -> new File(p).mkdirs() },
    getSelectedObjects  : { -> hierarchy.findAll { it.selected } },
    getAnnotationObjects: { -> hierarchy.findAll { it.objectType == "annotation" } },
    getDetectionObjects : { -> hierarchy.findAll { it.objectType != "annotation" } },
    exportObjectsToGeoJson: { objs, String path, String... options ->
        calls << "exportObjectsToGeoJson " + options.join(",")
        def feats = objs.collect { o -> [type: "Feature", id: UUID.randomUUID().toString(), geometry: o.geometry,
            properties: [objectType: o.objectType] + (o.className ? [classification: [name: o.className, color: [1, 2, 3]]] : [:])] }
        new File(path).text = JsonOutput.toJson([type: "FeatureCollection", features: feats])
    },
    getCurrentHierarchy : { -> [removeObjects: { objs, boolean keepChildren ->
                                   assert keepChildren
                                   calls << "removeObjects " + objs.size()
                                   objs.each { o -> o.getChildObjects().each { it.moveTo(o.parent) }; o.moveTo(null) }
                                   hierarchy.removeAll(objs) },
                                getRootObject: { -> root },
                                addObjectBelowParent: { parent, obj, boolean fireUpdate ->
                                   assert parent != null && !fireUpdate  // the script fires one update at the end
                                   calls << "addObjectBelowParent"; obj.moveTo(parent); hierarchy.add(obj) }] },
    addObjects          : { objs -> calls << "addObjects " + objs.size(); objs.each { it.moveTo(root) }; hierarchy.addAll(objs) },
    resolveHierarchy    : { -> calls << "resolveHierarchy" },
    fireHierarchyUpdate : { -> calls << "fireHierarchyUpdate" },
    getCurrentViewer    : { -> [getOverlayOptions: { -> [setMeasurementMapper: { m -> overlay.mapper = m }] }] },
])
def shell = new GroovyShell(binding)
def error = null
try {
    shell.evaluate(stubs + "\n" + text, new File(scriptPath).getName())
} catch (RuntimeException e) {
    error = e.getMessage()
}
def mapper = overlay.mapper
new File(config.state_out).text = JsonOutput.prettyPrint(JsonOutput.toJson([
    error    : error,
    calls    : calls,
    objects  : hierarchy.collect { [objectType: it.objectType, className: it.className, name: it.name, id: it.id,
                                    parent: it.parent.is(root) ? null : it.parent.id, selected: it.selected,
                                    geometry: it.geometry, measurements: it.measurements] },
    heatmap  : mapper == null ? null : [measurement: mapper.measurement, n: mapper.objects.size(), min: mapper.min, max: mapper.max,
                                        colorMap: mapper.colorMap],
]))
