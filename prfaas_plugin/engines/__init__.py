"""Engine adapters: each subpackage plugs the PrfaaS transfer engine into one inference engine."""
