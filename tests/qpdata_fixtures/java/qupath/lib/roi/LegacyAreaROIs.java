package qupath.lib.roi;

import java.awt.Shape;

import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.interfaces.ROI;

/** The legacy area ROI (serialised as AreaROI) that QuPath keeps when it re-saves data from older versions; its constructor is package-private. */
public class LegacyAreaROIs {

	public static ROI create(Shape shape, ImagePlane plane) {
		return new AWTAreaROI(shape, plane);
	}
}
