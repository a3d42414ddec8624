%%% The seed's robust messenger: Erlang's Getting Started guide, chapter "Robustness" (the seed,
%%% /work/shared/seed/robust-messenger.txt, is its LFE rendering), kept as written there except
%%% for what a benchmark needs, each marked BENCH below:
%%%  - what the seed prints (the server's "list is now", a client's replies and "Message from")
%%%    goes through an output fun, Out(Event); start_server/0 and client/2 pass print/1, which
%%%    prints exactly what the seed prints, so the seed's own API behaves as in the guide;
%%%  - server_node() may come from the command line (the guide edits the source);
%%%  - client/3 (a client with its own Out) and message/3 (send through a given client rather than
%%%    the registered mess_client) let one node run many users, one per client process.
%%%
%%% Message passing utility.
%%% User interface:
%%% logon(Name)
%%%     One user at a time can log in from each Erlang node in the
%%%     system messenger: and choose a suitable name. If the name
%%%     is already logged in at another node or if someone else is
%%%     already logged in at the same node, login will be rejected
%%%     with a suitable error message.
%%% logoff()
%%%     Logs off anybody at that node
%%% message(ToName, Message)
%%%     sends Message to ToName. Error messages if the user of this
%%%     function is not logged on or if ToName is not logged on at
%%%     any node.
%%%
%%% One node in the network of Erlang nodes runs a server which maintains
%%% data about the logged on users. The server is registered as "messenger"
%%% Each node where there is a user logged on runs a client process registered
%%% as "mess_client"
%%%
%%% Protocol between the client processes and the server
%%% ----------------------------------------------------
%%%
%%% To server: {ClientPid, logon, UserName}
%%% Reply {messenger, stop, user_exists_at_other_node} stops the client
%%% Reply {messenger, logged_on} logon was successful
%%%
%%% When the client terminates for some reason
%%% To server: {'EXIT', ClientPid, Reason}
%%%
%%% To server: {ClientPid, message_to, ToName, Message} send a message
%%% Reply: {messenger, stop, you_are_not_logged_on} stops the client
%%% Reply: {messenger, receiver_not_found} no user with this name logged on
%%% Reply: {messenger, sent} Message has been sent (but no guarantee)
%%%
%%% To client: {message_from, Name, Message},
%%%
%%% Protocol between the "commands" and the client
%%% ----------------------------------------------
%%%
%%% Started: messenger:client(Server_Node, Name)
%%% To client: logoff
%%% To client: {message_to, ToName, Message}
%%%
%%% Configuration: change the server_node() function to return the
%%% name of the node where the messenger server runs

-module(messenger).
-export([start_server/0, start_server/1, server/1,
         logon/1, logoff/0, message/2, client/2,
         client/3, message/3, print/1]).

%%% Change the function below to return the name of the node where the
%%% messenger server runs
%%% BENCH: or give it on the command line: erl -server_node messenger@host
server_node() ->
    case init:get_argument(server_node) of
        {ok, [[Node | _] | _]} -> list_to_atom(Node);
        error -> messenger@super
    end.

%%% This is the server process for the "messenger"
%%% the user list has the format [{ClientPid1, Name1},{ClientPid22, Name2},...]
server(Out) ->
    process_flag(trap_exit, true),
    server(Out, []).

server(Out, User_List) ->
    receive
        {From, logon, Name} ->
            New_User_List = server_logon(From, Name, User_List),
            server(Out, New_User_List);
        {'EXIT', From, _} ->
            New_User_List = server_logoff(From, User_List),
            server(Out, New_User_List);
        {From, message_to, To, Message} ->
            server_transfer(From, To, Message, User_List),
            Out({list_is_now, User_List}),
            server(Out, User_List)
    end.

%%% Start the server
start_server() ->
    start_server(fun print/1).

start_server(Out) ->
    register(messenger, spawn(messenger, server, [Out])).

%%% Server adds a new user to the user list
server_logon(From, Name, User_List) ->
    %% check if logged on anywhere else
    case lists:keymember(Name, 2, User_List) of
        true ->
            From ! {messenger, stop, user_exists_at_other_node},  %reject logon
            User_List;
        false ->
            From ! {messenger, logged_on},
            link(From),
            [{From, Name} | User_List]        %add user to the list
    end.

%%% Server deletes a user from the user list
server_logoff(From, User_List) ->
    lists:keydelete(From, 1, User_List).


%%% Server transfers a message between user
server_transfer(From, To, Message, User_List) ->
    %% check that the user is logged on and who he is
    case lists:keysearch(From, 1, User_List) of
        false ->
            From ! {messenger, stop, you_are_not_logged_on};
        {value, {_, Name}} ->
            server_transfer(From, Name, To, Message, User_List)
    end.

%%% If the user exists, send the message
server_transfer(From, Name, To, Message, User_List) ->
    %% Find the receiver and send the message
    case lists:keysearch(To, 2, User_List) of
        false ->
            From ! {messenger, receiver_not_found};
        {value, {ToPid, To}} ->
            ToPid ! {message_from, Name, Message},
            From ! {messenger, sent}
    end.

%%% User Commands
logon(Name) ->
    case whereis(mess_client) of
        undefined ->
            register(mess_client,
                     spawn(messenger, client, [server_node(), Name]));
        _ -> already_logged_on
    end.

logoff() ->
    mess_client ! logoff.

message(ToName, Message) ->
    case whereis(mess_client) of % Test if the client is running
        undefined ->
            not_logged_on;
        _ -> mess_client ! {message_to, ToName, Message},
             ok
    end.

%%% BENCH: message/2 through a given client process, for nodes with many users.
message(Client, ToName, Message) ->
    Client ! {message_to, ToName, Message},
    ok.

%%% The client process which runs on each user node
client(Server_Node, Name) ->
    client(Server_Node, Name, fun print/1).

client(Server_Node, Name, Out) ->
    {messenger, Server_Node} ! {self(), logon, Name},
    await_result(Out),
    client_loop(Server_Node, Out).

client_loop(Server_Node, Out) ->
    receive
        logoff ->
            exit(normal);
        {message_to, ToName, Message} ->
            {messenger, Server_Node} ! {self(), message_to, ToName, Message},
            await_result(Out);
        {message_from, FromName, Message} ->
            Out({message_from, FromName, Message})
    end,
    client_loop(Server_Node, Out).

%%% wait for a response from the server
await_result(Out) ->
    receive
        {messenger, stop, Why} -> % Stop the client
            Out({stop, Why}),
            exit(normal);
        {messenger, What} ->  % Normal response
            Out({result, What})
    after 5000 ->
            Out(timeout),
            exit(timeout)
    end.

%%% What the seed prints, word for word.
print({list_is_now, User_List}) -> io:format("list is now: ~p~n", [User_List]);
print({message_from, FromName, Message}) ->
    io:format("Message from ~p: ~p~n", [FromName, Message]);
print({stop, Why}) -> io:format("~p~n", [Why]);
print({result, What}) -> io:format("~p~n", [What]);
print(timeout) -> io:format("No response from server~n", []).
