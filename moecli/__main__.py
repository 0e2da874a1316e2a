from moecli.cli.main import main

main()
