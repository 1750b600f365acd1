"""Everything that talks to MongoDB: the embedded server, the LaunchPad, the collections."""
