"""Dataset generation with a local LLM: backends, prompts, recipes, filters and the pipeline that ties them.

    from instar.generate.pipeline import GenerateConfig, generate
    generate(store, GenerateConfig(kind="instructions", count=100))       # = `instar generate instructions -n 100`
"""
