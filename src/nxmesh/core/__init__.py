"""The NxMesh core: hook specs, plugin composition, domain model, protocol and settings.

No I/O policy lives here; providers (storage, transports, drivers...) are plugins.
"""
