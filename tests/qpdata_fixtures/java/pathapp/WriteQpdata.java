package pathapp;

import java.awt.geom.Area;
import java.awt.geom.Rectangle2D;
import java.awt.image.BufferedImage;
import java.io.File;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.List;

import org.locationtech.jts.io.WKTReader;

import qupath.lib.images.ImageData;
import qupath.lib.images.servers.WrappedBufferedImageServer;
import qupath.lib.io.GsonTools;
import qupath.lib.io.PathIO;
import qupath.lib.measurements.MeasurementList;
import qupath.lib.measurements.MeasurementListFactory;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.PathObjects;
import qupath.lib.objects.TMACoreObject;
import qupath.lib.objects.classes.PathClass;
import qupath.lib.objects.classes.PathClassFactory;
import qupath.lib.objects.hierarchy.DefaultTMAGrid;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.GeometryTools;
import qupath.lib.roi.LegacyAreaROIs;
import qupath.lib.roi.ROIs;
import qupath.lib.roi.interfaces.ROI;

/**
 * Writes a data.qpdata with one object of every kind and ROI type through QuPath's own PathIO, then
 * reads it back with QuPath's PathIO.readHierarchy and writes what QuPath sees as GeoJSON (QuPath's
 * own Gson adapters), one feature per object in depth-first order with "parent" = index of the parent
 * feature (-1 under the root). Compiled against one QuPath version's qupath-core sources at a time
 * (see make_fixtures.sh); the two calls whose names changed between versions go through reflection.
 *
 * Usage: WriteQpdata OUT_DIR
 */
public class WriteQpdata {

	static final ImagePlane PLANE = ImagePlane.getDefaultPlane();

	public static void main(String[] args) throws Exception {
		File out = new File(args[0]);
		out.mkdirs();
		PathObjectHierarchy hierarchy = new PathObjectHierarchy();

		PathClass tumor = PathClassFactory.getPathClass("Tumor", rgb(200, 0, 0));
		PathClass stroma = PathClassFactory.getPathClass("Stroma", rgb(150, 200, 150));
		PathClass positive = PathClassFactory.getDerivedPathClass(tumor, "Positive", rgb(250, 60, 60));

		// A rectangle with nested objects: a polygon annotation, detections, tiles and cells inside it.
		PathObject rect = PathObjects.createAnnotationObject(ROIs.createRectangleROI(100, 100, 800, 600, PLANE), tumor,
				list(MeasurementList.MeasurementListType.GENERAL, "Area note", 1.5, "Score µ", -2.25));
		rect.setName("big rectangle");
		setColor(rect, rgb(10, 20, 30)); // QuPath 0.2's GeoJSON export fails on a named object without a colour
		rect.setLocked(true);
		add(hierarchy, rect);

		PathObject inner = PathObjects.createAnnotationObject(
				ROIs.createPolygonROI(new double[] {200, 400, 300.5}, new double[] {200, 220, 450.25}, PLANE), positive);
		add(hierarchy, inner);

		add(hierarchy, PathObjects.createDetectionObject(ROIs.createEllipseROI(500, 500, 40, 30, PLANE), stroma,
				list(MeasurementList.MeasurementListType.FLOAT, "Mean", 0.1f, "Max", 3.0)));
		add(hierarchy, PathObjects.createTileObject(ROIs.createRectangleROI(600, 150, 64, 64, PLANE), null,
				list(MeasurementList.MeasurementListType.DOUBLE, "prob: Tumor", 0.875, "NaN value", Double.NaN)));
		PathObject cell = PathObjects.createCellObject(ROIs.createEllipseROI(700, 300, 30, 30, PLANE),
				ROIs.createEllipseROI(708, 308, 14, 12, PLANE), tumor,
				list(MeasurementList.MeasurementListType.FLOAT, "Nucleus: Area", 132.0, "Cell: Area", 706.5));
		add(hierarchy, cell);
		add(hierarchy, PathObjects.createCellObject(ROIs.createPolygonROI(new double[] {760, 790, 775}, new double[] {600, 600, 640}, PLANE),
				null, null, null));

		// Areas with holes and several parts: a JTS geometry (GeometryROI, WKB) and the legacy AreaROI.
		var multi = new WKTReader().read("MULTIPOLYGON (((1000 1000, 1400 1000, 1400 1400, 1000 1400, 1000 1000), "
				+ "(1100 1100, 1100 1200, 1200 1200, 1200 1100, 1100 1100)), ((1500 1000, 1600 1000, 1550 1100, 1500 1000)))");
		PathObject geometry = PathObjects.createAnnotationObject(GeometryTools.geometryToROI(multi, PLANE), stroma);
		geometry.setName("two parts, one hole");
		setColor(geometry, rgb(40, 50, 60));
		add(hierarchy, geometry);

		Area area = new Area(new Rectangle2D.Double(100, 1000, 300, 300));
		area.subtract(new Area(new Rectangle2D.Double(150, 1050, 100, 100)));
		area.add(new Area(new Rectangle2D.Double(500, 1000, 50, 80)));
		add(hierarchy, PathObjects.createAnnotationObject(LegacyAreaROIs.create(area, PLANE), tumor));

		// Lines and points, unclassified, with the object's own colour.
		PathObject line = PathObjects.createAnnotationObject(ROIs.createLineROI(1000, 100, 1300, 250.5, PLANE));
		setColor(line, rgb(0, 0, 255));
		add(hierarchy, line);
		add(hierarchy, PathObjects.createAnnotationObject(
				ROIs.createPolylineROI(new double[] {1000, 1100, 1200, 1250}, new double[] {400, 450, 400, 500}, PLANE)));
		PathObject points = PathObjects.createAnnotationObject(
				ROIs.createPointsROI(new double[] {1500.5, 1600, 1700}, new double[] {300, 350.25, 300}, PLANE));
		points.setName("three points");
		setColor(points, rgb(70, 80, 90));
		add(hierarchy, points);

		// A TMA grid of two cores; a detection in the first core.
		List<TMACoreObject> cores = new ArrayList<>();
		cores.add(PathObjects.createTMACoreObject(1700, 1700, 200, false));
		cores.add(PathObjects.createTMACoreObject(1900, 1700, 150, true));
		hierarchy.setTMAGrid(DefaultTMAGrid.create(cores, 2));
		add(hierarchy, PathObjects.createDetectionObject(ROIs.createRectangleROI(1690, 1690, 20, 20, PLANE)));

		var server = new WrappedBufferedImageServer("fixture", new BufferedImage(2000, 2000, BufferedImage.TYPE_INT_RGB));
		var imageData = new ImageData<BufferedImage>(server, hierarchy, ImageData.ImageType.BRIGHTFIELD_H_E);
		File qpdata = new File(out, "data.qpdata");
		PathIO.writeImageData(qpdata, imageData);

		// What QuPath reads back from the file, as QuPath's own GeoJSON.
		PathObjectHierarchy read = PathIO.readHierarchy(qpdata);
		List<PathObject> order = new ArrayList<>();
		List<Integer> parents = new ArrayList<>();
		walk(read.getRootObject(), -1, order, parents);
		var gson = GsonTools.getInstance();
		var features = new com.google.gson.JsonArray();
		for (int i = 0; i < order.size(); i++) {
			// toJson then parse: QuPath's adapters write raw JSON values, which Gson's tree writer refuses
			var feature = com.google.gson.JsonParser.parseString(gson.toJson(order.get(i), PathObject.class)).getAsJsonObject();
			feature.addProperty("parent", parents.get(i));
			feature.addProperty("roiType", order.get(i).getROI().getClass().getSimpleName());
			features.add(feature);
		}
		Files.write(new File(out, "expected.json").toPath(), gson.toJson(features).getBytes(StandardCharsets.UTF_8));
	}

	static void walk(PathObject parent, int parentIndex, List<PathObject> order, List<Integer> parents) {
		for (PathObject child : parent.getChildObjectsAsArray()) {
			order.add(child);
			parents.add(parentIndex);
			walk(child, order.size() - 1, order, parents);
		}
	}

	static Integer rgb(int r, int g, int b) {
		return (255 << 24) | (r << 16) | (g << 8) | b;
	}

	static MeasurementList list(MeasurementList.MeasurementListType type, Object... namesValues) throws Exception {
		MeasurementList list = MeasurementListFactory.createMeasurementList(namesValues.length / 2, type);
		Method put = method(list.getClass(), new String[] {"put", "putMeasurement"}, String.class, double.class);
		for (int i = 0; i < namesValues.length; i += 2)
			put.invoke(list, namesValues[i], ((Number)namesValues[i + 1]).doubleValue());
		list.close();
		return list;
	}

	/** Inserted where QuPath would put it: under the smallest annotation (or TMA core) that contains it. */
	static void add(PathObjectHierarchy hierarchy, PathObject object) {
		hierarchy.insertPathObject(object, true);
	}

	static void setColor(PathObject object, Integer color) throws Exception {
		method(object.getClass(), new String[] {"setColor", "setColorRGB"}, Integer.class).invoke(object, color);
	}

	static Method method(Class<?> cls, String[] names, Class<?>... types) throws NoSuchMethodException {
		for (String name : names) {
			try {
				Method m = cls.getMethod(name, types);
				m.setAccessible(true);
				return m;
			} catch (NoSuchMethodException e) {
				continue;
			}
		}
		throw new NoSuchMethodException(String.join("/", names) + " in " + cls);
	}
}
