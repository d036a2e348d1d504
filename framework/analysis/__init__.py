"""Feature analysis: examples, logit effects, composition, ablation and dashboards (`sae analyze`).

Entry points: `analyze.analyze(recipe)` (the stage), `analyze.analyze_sae(model, trained, corpus,
cfg, out)` (the same on objects already in memory) and `dashboard.write_dashboard(out)` (render
the dashboard again from features.json, e.g. after autointerp wrote its scores). See
docs/analysis.md.
"""
