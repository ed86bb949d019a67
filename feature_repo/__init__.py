"""The Feast repository of the lakehouse (a package so that it ships in the wheel)."""
