"""Crystal structures: reading and checking them, cheap descriptors, graphs and filters."""
