# kdcli bash completion; regenerate: kdcli completions bash > completions/kdcli.bash
_kdcli_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _KDCLI_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _kdcli_completion kdcli
