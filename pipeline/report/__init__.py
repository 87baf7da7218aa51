"""The report's parts: the paper's figures (``figures``, with ``tanglegram`` and
``label_placement`` for Figures 6-7), the brain maps (``volumes``), the fit's diagnostics
(``diagnostics``), the sections that put them on the page (``sections``) and the HTML page
rendered from ``templates/`` (``page``). The stage that decides what is drawn and written
where is ``neurotask.pipeline.stages.report``."""
