"""S/MIME: the CMS codec, opening received mail, composing sent mail (used by inbound and delivery alike)."""
