"""The reference master app: REST API, auth and RBAC, composed from plugins."""
