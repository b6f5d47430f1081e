from prfaas_plugin.cli import main

main()
