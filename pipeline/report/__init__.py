"""The report's parts: the paper's figures (``figures``) and the HTML page rendered from
``templates/`` (``page``). The stage that decides what is drawn and written where is
``neurotask.pipeline.stages.report``."""
