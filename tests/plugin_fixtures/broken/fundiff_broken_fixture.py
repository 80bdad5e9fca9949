"""A plugin that cannot be imported, as when an optional native dependency is missing."""

raise ImportError("fundiff-broken-fixture needs the 'warpdrive' extension, which is not installed")
