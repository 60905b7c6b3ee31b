from dicesim.cli import main

main()
