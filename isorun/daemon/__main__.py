from isorun.daemon.main import main

main()
