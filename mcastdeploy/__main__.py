from mcastdeploy.cli.main import main

main()
