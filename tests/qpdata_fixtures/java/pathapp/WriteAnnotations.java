package pathapp;

import java.awt.image.BufferedImage;
import java.io.File;

import qupath.lib.images.ImageData;
import qupath.lib.images.servers.WrappedBufferedImageServer;
import qupath.lib.io.PathIO;
import qupath.lib.objects.PathObjects;
import qupath.lib.objects.classes.PathClassFactory;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.roi.ROIs;

/**
 * A data file of classified rectangle annotations, written by QuPath's PathIO, for tests that need a
 * project entry annotated over a real slide.
 *
 * Usage: WriteAnnotations OUT_QPDATA CLASS:X,Y,WIDTH,HEIGHT ...
 */
public class WriteAnnotations {

	public static void main(String[] args) throws Exception {
		PathObjectHierarchy hierarchy = new PathObjectHierarchy();
		for (int i = 1; i < args.length; i++) {
			String[] parts = args[i].split(":");
			String[] box = parts[1].split(",");
			var roi = ROIs.createRectangleROI(Double.parseDouble(box[0]), Double.parseDouble(box[1]),
					Double.parseDouble(box[2]), Double.parseDouble(box[3]), WriteQpdata.PLANE);
			int hash = parts[0].hashCode();
			var pathClass = PathClassFactory.getPathClass(parts[0], WriteQpdata.rgb(hash & 255, (hash >> 8) & 255, (hash >> 16) & 255));
			hierarchy.insertPathObject(PathObjects.createAnnotationObject(roi, pathClass), true);
		}
		var server = new WrappedBufferedImageServer("annotations", new BufferedImage(64, 64, BufferedImage.TYPE_INT_RGB));
		PathIO.writeImageData(new File(args[0]), new ImageData<BufferedImage>(server, hierarchy, ImageData.ImageType.BRIGHTFIELD_H_E));
	}
}
