package pathapp;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.List;

import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;

import qupath.lib.common.ColorTools;
import qupath.lib.io.PathIO;
import qupath.lib.objects.PathCellObject;
import qupath.lib.objects.PathObject;

/**
 * Reads a data.qpdata with QuPath's own PathIO.readHierarchy and writes, per object in depth-first
 * order, what QuPath sees: type, class, colours, name, lock, parent index, ROI type and number of
 * vertices, and the JTS geometry's area, length, envelope and centroid (compact enough to keep
 * beside tests for data files whose GeoJSON would be megabytes).
 *
 * Usage: ReadQpdata DATA_QPDATA OUT_JSON
 */
public class ReadQpdata {

	public static void main(String[] args) throws Exception {
		var hierarchy = PathIO.readHierarchy(new File(args[0]));
		List<PathObject> order = new ArrayList<>();
		List<Integer> parents = new ArrayList<>();
		WriteQpdata.walk(hierarchy.getRootObject(), -1, order, parents);
		JsonArray out = new JsonArray();
		for (int i = 0; i < order.size(); i++) {
			PathObject o = order.get(i);
			JsonObject j = new JsonObject();
			j.addProperty("type", o.getClass().getSimpleName());
			j.addProperty("parent", parents.get(i));
			j.addProperty("name", o.getName());
			j.addProperty("class", o.getPathClass() == null ? null : o.getPathClass().toString());
			Integer classColor = o.getPathClass() == null ? null : o.getPathClass().getColor();
			j.add("classColor", rgb(classColor));
			j.addProperty("locked", o.isLocked());
			var roi = o.getROI();
			j.addProperty("roiType", roi.getClass().getSimpleName());
			j.addProperty("numPoints", roi.getNumPoints());
			var g = roi.getGeometry();
			j.addProperty("area", g.getArea());
			j.addProperty("length", g.getLength());
			var env = g.getEnvelopeInternal();
			JsonArray bounds = new JsonArray();
			bounds.add(env.getMinX()); bounds.add(env.getMinY()); bounds.add(env.getMaxX()); bounds.add(env.getMaxY());
			j.add("bounds", bounds);
			j.addProperty("nucleus", o instanceof PathCellObject && ((PathCellObject)o).getNucleusROI() != null);
			j.addProperty("measurements", o.getMeasurementList().size());
			out.add(j);
		}
		Files.write(new File(args[1]).toPath(), new GsonBuilder().serializeNulls().create().toJson(out).getBytes(StandardCharsets.UTF_8));
	}

	static JsonArray rgb(Integer color) {
		if (color == null)
			return null;
		JsonArray a = new JsonArray();
		a.add(ColorTools.red(color)); a.add(ColorTools.green(color)); a.add(ColorTools.blue(color));
		return a;
	}
}
