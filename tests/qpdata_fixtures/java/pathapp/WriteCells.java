package pathapp;

import java.awt.image.BufferedImage;
import java.io.File;

import qupath.lib.images.ImageData;
import qupath.lib.images.servers.WrappedBufferedImageServer;
import qupath.lib.io.PathIO;
import qupath.lib.measurements.MeasurementList;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.PathObjects;
import qupath.lib.objects.classes.PathClassFactory;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.roi.ROIs;

/**
 * A data file the size of a cell-detection result, for benchmarks/bench_qpdata.py: N cells (cell and
 * nucleus polygons of 24 and 16 vertices, 40 float measurements each, as QuPath's cell detection
 * makes them) inside one annotation, written by QuPath's PathIO.
 *
 * Usage: WriteCells OUT_QPDATA N
 */
public class WriteCells {

	public static void main(String[] args) throws Exception {
		int n = Integer.parseInt(args[1]);
		int side = (int)Math.ceil(Math.sqrt(n));
		var tumor = PathClassFactory.getPathClass("Tumor", WriteQpdata.rgb(200, 0, 0));
		var stroma = PathClassFactory.getPathClass("Stroma", WriteQpdata.rgb(150, 200, 150));
		PathObjectHierarchy hierarchy = new PathObjectHierarchy();
		PathObject annotation = PathObjects.createAnnotationObject(ROIs.createRectangleROI(0, 0, side * 20.0, side * 20.0, WriteQpdata.PLANE), tumor);
		hierarchy.insertPathObject(annotation, false);
		var addChild = WriteQpdata.method(annotation.getClass(), new String[] {"addChildObject", "addPathObject"}, PathObject.class);
		Object[] names = new Object[80];
		for (int m = 0; m < 40; m++) {
			names[2 * m] = "Cell: measurement " + m;
			names[2 * m + 1] = 0.0;
		}
		for (int i = 0; i < n; i++) {
			double cx = (i % side) * 20.0 + 10, cy = (i / side) * 20.0 + 10;
			for (int m = 0; m < 40; m++)
				names[2 * m + 1] = (double)((i * 31 + m * 7) % 1000) / 10.0;
			var cell = PathObjects.createCellObject(ring(cx, cy, 8, 24), ring(cx, cy, 4, 16), i % 2 == 0 ? tumor : stroma,
					WriteQpdata.list(MeasurementList.MeasurementListType.FLOAT, names));
			addChild.invoke(annotation, cell);
		}
		var server = new WrappedBufferedImageServer("cells", new BufferedImage(64, 64, BufferedImage.TYPE_INT_RGB));
		PathIO.writeImageData(new File(args[0]), new ImageData<BufferedImage>(server, hierarchy, ImageData.ImageType.BRIGHTFIELD_H_E));
	}

	static qupath.lib.roi.interfaces.ROI ring(double cx, double cy, double r, int k) {
		double[] x = new double[k], y = new double[k];
		for (int j = 0; j < k; j++) {
			x[j] = cx + r * Math.cos(2 * Math.PI * j / k);
			y[j] = cy + r * Math.sin(2 * Math.PI * j / k);
		}
		return ROIs.createPolygonROI(x, y, WriteQpdata.PLANE);
	}
}
