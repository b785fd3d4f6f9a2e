"""The data loop: label issues in labelled images, suggestions for unlabelled ones."""
