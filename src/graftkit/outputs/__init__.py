"""What a run leaves and what is done with it: the run folder, scores, figures, report, export."""
