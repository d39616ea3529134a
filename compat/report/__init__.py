"""Reports: what people read. The shared vocabulary (layout slugs, outcomes, a reason's
headline, the one spelling of unmet), the terminal view of a run, Markdown, HTML, the heatmap, the
diff of two runs, side by side, and the families view.
"""
