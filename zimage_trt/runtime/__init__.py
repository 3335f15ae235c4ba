"""The run time: ``Pipeline`` (prompts → captions → stages → VAE → images) and the service API
every entry point calls — ``Pipeline.open`` from a model or an engine folder with every check
made before any work (``loading``, ``preflight``), typed requests and results (``requests``),
prompt caches (``text``), images out (``images``) and re-renders (``reproduce``).

Never imports diffusers or transformers.
"""
