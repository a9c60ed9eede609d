"""Built-in plugins. Each is an ordinary plugin module registered through the ``nxmesh``
entry-point group, using only the public ``nxmesh`` API — copy any of them to start your own."""
