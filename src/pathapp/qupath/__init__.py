"""QuPath interop without Java: its GeoJSON dialect (`geojson`), its projects (`project`), and the
optional paquo bridge (`paquo_bridge`, imported only when asked, since paquo starts a JVM)."""
