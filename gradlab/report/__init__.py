"""The report side: reads run directories and record frames, never imports torch (text, figures, HTML)."""
