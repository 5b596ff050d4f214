# kdcli fish completion; regenerate: kdcli completions fish > completions/kdcli.fish
complete --command kdcli --no-files --arguments "(env _KDCLI_COMPLETE=complete_fish _TYPER_COMPLETE_FISH_ACTION=get-args _TYPER_COMPLETE_ARGS=(commandline -cp) kdcli)" --condition "env _KDCLI_COMPLETE=complete_fish _TYPER_COMPLETE_FISH_ACTION=is-args _TYPER_COMPLETE_ARGS=(commandline -cp) kdcli"
