"""Example NxMesh plugin."""
