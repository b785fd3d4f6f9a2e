"""Data in: image folders and tables scanned, checked, split, decoded and augmented."""
