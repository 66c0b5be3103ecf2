from isorun.cli.main import main

main()
